// Hover hints for the Personalization Guidance accordion, in webui's usual way:
// webui's hints.js shows titles[label text] as the tooltip of each label.
(function() {
    const hints = {
        "Personalization Guidance": "Compute CFG's unconditional branch with a weak model (your checkpoint pulled back toward its base) to keep your subject while following the prompt. Same cost as CFG.",
        "Weak model strength ω (lower = stronger pull toward your subject; 1 = plain CFG)": "ω interpolates the weak model between the base checkpoint (0) and your model (1). Lower values push harder toward what fine-tuning learned; 1 gives exactly plain CFG.",
        "Base checkpoint (the one your model was trained from)": "The checkpoint your DreamBooth/fine-tune started from, e.g. SD 1.5 for an SD 1.5 DreamBooth. It must be the same architecture as the active model. 'Automatic' picks the listed checkpoint closest to yours in weight space. Empty: no base (strip LoRAs instead).",
        "Weak branch prompt": "What the weak branch reads: your negative prompt (default), or always the empty prompt as in the paper.",
        "Negative prompt (as CFG)": "The weak branch reads the negative prompt, like CFG's unconditional branch (an empty negative prompt is the paper's null prompt).",
        "Empty prompt (as the paper)": "The weak branch always reads the empty prompt (the paper's null prompt) and ignores the negative prompt.",
        "LoRAs to strip (names from the prompt, comma-separated; * = all)": "For a subject LoRA: the weak model is your model with these LoRAs scaled by ω (ω = 0 removes them). Other LoRAs stay at full strength in both branches. Leave empty to use only the base checkpoint.",
        "ω schedule over the steps": "Constant ω, or ω moving from the slider's value to 'ω at the end' over the active steps.",
        "ω at the end (linear / cosine schedule)": "The ω reached at the end of the active steps when the schedule is linear or cosine.",
        "Active from (fraction of steps)": "PG acts from this fraction of the sampling steps on; before it, steps are plain CFG.",
        "Active until (fraction of steps)": "PG acts until this fraction of the sampling steps; after it, steps are plain CFG."
    };
    if (typeof titles !== "undefined") {
        Object.assign(titles, hints);
    }
})();
