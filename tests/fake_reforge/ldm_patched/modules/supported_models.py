"""ldm_patched/modules/supported_models.py (@ 3b56b268): the model classes' names (PG reads
type(model_config).__name__) and, for SDXL and SD 2.x, process_clip_state_dict (:102-108, :227-243:
the sgm/ldm text-encoder keys renamed to `clip_l.` / `clip_g.` / `clip_h.`, OpenCLIP converted to
the Hugging Face layout, SDXL's clip_g projection moved back to the bare `clip_g.text_projection`;
the `use_old_clip_g_load_and_ztsnr_application` option is left at its default, off)."""

from ldm_patched.modules import utils


class SD15:
    pass


class SD20:
    def process_clip_state_dict(self, state_dict):
        replace_prefix = {}
        replace_prefix["conditioner.embedders.0.model."] = "clip_h."  # SD2 in sgm format
        replace_prefix["cond_stage_model.model."] = "clip_h."
        state_dict = utils.state_dict_prefix_replace(state_dict, replace_prefix, filter_keys=True)
        state_dict = utils.clip_text_transformers_convert(state_dict, "clip_h.", "clip_h.transformer.")
        return state_dict


class SDXL:
    def process_clip_state_dict(self, state_dict):
        keys_to_replace = {}
        replace_prefix = {}
        replace_prefix["conditioner.embedders.0.transformer.text_model"] = "clip_l.transformer.text_model"
        replace_prefix["conditioner.embedders.1.model."] = "clip_g."
        state_dict = utils.state_dict_prefix_replace(state_dict, replace_prefix, filter_keys=True)
        state_dict = utils.state_dict_key_replace(state_dict, keys_to_replace)
        state_dict = utils.clip_text_transformers_convert(state_dict, "clip_g.", "clip_g.transformer.")
        if "clip_g.text_projection" not in state_dict and "clip_g.transformer.text_projection.weight" in state_dict:
            state_dict["clip_g.text_projection"] = state_dict.pop("clip_g.transformer.text_projection.weight").transpose(0, 1)
        return state_dict


class SDXLRefiner:
    pass


class Flux:
    pass
