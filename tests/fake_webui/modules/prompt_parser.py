"""Fake of webui 1.10.1 modules/prompt_parser.py.

Supports plain prompts, ``AND`` composition with optional ``:weight``, and prompt editing
in its basic, non-nested form ``[from:to:when]`` / ``[to:when]`` (any number of them in a
prompt), with webui's step rules: ``when`` without a decimal point is a step number,
with one it is a fraction of ``steps``; for a hires pass (``hires_steps``) the integer
is offset by the first-pass steps and the fraction by 1.0; ``use_old_scheduling`` uses
webui's old rule (< 1 is a fraction).  Alternation ``[a|b]``, nesting and emphasis are
left in the text unchanged.  Tensors and shapes returned are those of webui.
"""

from __future__ import annotations

import re
from collections import namedtuple

import torch

_part = r"((?:[^\[\]:|()]|\([^()]*\))*)"  # text, where "(...)" groups may hold ':' (emphasis weights)
_re_edit = re.compile(r"\[" + _part + r"(?::" + _part + r")?:\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*\]")


# modules/prompt_parser.py:get_learned_conditioning_prompt_schedules
def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None, use_old_scheduling=False):
    if hires_steps is None or use_old_scheduling:
        int_offset, flt_offset, steps = 0, 0.0, base_steps
    else:
        int_offset, flt_offset, steps = base_steps, 1.0, hires_steps

    def boundary(text):
        value = float(text)
        if use_old_scheduling:
            value = value * steps if value < 1 else value
        elif "." in text:
            value = (value - flt_offset) * steps
        else:
            value = value - int_offset
        return min(steps, int(value))

    def schedule(prompt):
        edits = [(m, boundary(m.group(3))) for m in _re_edit.finditer(prompt)]
        ends = sorted({steps} | {when for _, when in edits if when >= 1})

        def text_at(step):
            out, pos = [], 0
            for m, when in edits:
                before, after = (m.group(1), m.group(2)) if m.group(2) is not None else ("", m.group(1))
                out += [prompt[pos:m.start()], before if step <= when else after]
                pos = m.end()
            return "".join(out) + prompt[pos:]

        return [[end, text_at(end)] for end in ends]

    cache = {}
    for prompt in prompts:
        if prompt not in cache:
            cache[prompt] = schedule(prompt)
    return [cache[prompt] for prompt in prompts]


ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])  # modules/prompt_parser.py:ScheduledPromptConditioning


class SdConditioning(list):
    # modules/prompt_parser.py:SdConditioning
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__(prompts)
        source = prompts if copy_from is None else copy_from
        self.is_negative_prompt = is_negative_prompt or getattr(source, 'is_negative_prompt', False)
        self.width = width or getattr(source, 'width', None)
        self.height = height or getattr(source, 'height', None)


# modules/prompt_parser.py:get_learned_conditioning
def get_learned_conditioning(model, prompts: SdConditioning | list[str], steps, hires_steps=None, use_old_scheduling=False):
    schedules = get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps, use_old_scheduling)
    done = {}
    res = []
    for prompt, prompt_schedule in zip(prompts, schedules):
        if prompt not in done:
            texts = SdConditioning([text for _, text in prompt_schedule], copy_from=prompts)
            conds = model.get_learned_conditioning(texts)
            entries = []
            for i, (end_at_step, _) in enumerate(prompt_schedule):
                cond = {k: v[i] for k, v in conds.items()} if isinstance(conds, dict) else conds[i]
                entries.append(ScheduledPromptConditioning(end_at_step, cond))
            done[prompt] = entries
        res.append(done[prompt])
    return res


re_AND = re.compile(r"\bAND\b")  # modules/prompt_parser.py:re_AND
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")  # modules/prompt_parser.py:re_weight


# modules/prompt_parser.py:get_multicond_prompt_list
def get_multicond_prompt_list(prompts: SdConditioning | list[str]):
    flat = SdConditioning(prompts)
    flat.clear()
    index_of = {}
    res_indexes = []
    for prompt in prompts:
        entry = []
        for part in re_AND.split(prompt):
            m = re_weight.search(part)
            text, weight = m.groups() if m is not None else (part, None)
            weight = 1.0 if weight is None else float(weight)
            if text not in index_of:
                index_of[text] = len(flat)
                flat.append(text)
            entry.append((index_of[text], weight))
        res_indexes.append(entry)
    return res_indexes, flat, index_of


class ComposableScheduledPromptConditioning:
    # modules/prompt_parser.py:ComposableScheduledPromptConditioning
    def __init__(self, schedules, weight=1.0):
        self.schedules: list[ScheduledPromptConditioning] = schedules
        self.weight: float = weight


class MulticondLearnedConditioning:
    # modules/prompt_parser.py:MulticondLearnedConditioning
    def __init__(self, shape, batch):
        self.shape: tuple = shape
        self.batch: list[list[ComposableScheduledPromptConditioning]] = batch


# modules/prompt_parser.py:get_multicond_learned_conditioning
def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False) -> MulticondLearnedConditioning:
    res_indexes, flat, _ = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(model, flat, steps, hires_steps, use_old_scheduling)
    batch = [[ComposableScheduledPromptConditioning(learned[i], weight) for i, weight in entry] for entry in res_indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


class DictWithShape(dict):
    # modules/prompt_parser.py:DictWithShape
    def __init__(self, x, shape=None):
        super().__init__(x)

    # modules/prompt_parser.py:DictWithShape.shape
    @property
    def shape(self):
        return self["crossattn"].shape


def _pick(cond_schedule, current_step):
    # the schedule-entry lookup shared by reconstruct_cond_batch / reconstruct_multicond_batch
    for entry in cond_schedule:
        if current_step <= entry.end_at_step:
            return entry.cond
    return cond_schedule[0].cond


# modules/prompt_parser.py:reconstruct_cond_batch
def reconstruct_cond_batch(c: list[list[ScheduledPromptConditioning]], current_step):
    # like webui, all rows must have the shape of the first one (no padding here)
    first = c[0][0].cond
    if isinstance(first, dict):
        res = DictWithShape({k: torch.zeros((len(c),) + v.shape, device=v.device, dtype=v.dtype) for k, v in first.items()})
        for i, schedule in enumerate(c):
            for k, v in _pick(schedule, current_step).items():
                res[k][i] = v
        return res

    res = torch.zeros((len(c),) + first.shape, device=first.device, dtype=first.dtype)
    for i, schedule in enumerate(c):
        res[i] = _pick(schedule, current_step)
    return res


# modules/prompt_parser.py:stack_conds
def stack_conds(tensors):
    # rows with fewer tokens are padded by repeating their own last token vector
    longest = max(t.shape[0] for t in tensors)
    padded = [t if t.shape[0] == longest else torch.cat([t, t[-1:].expand(longest - t.shape[0], *t.shape[1:])]) for t in tensors]
    return torch.stack(padded)


# modules/prompt_parser.py:reconstruct_multicond_batch
def reconstruct_multicond_batch(c: MulticondLearnedConditioning, current_step):
    first = c.batch[0][0].schedules[0].cond
    tensors, conds_list = [], []
    for composable_prompts in c.batch:
        row = []
        for composable in composable_prompts:
            row.append((len(tensors), composable.weight))
            tensors.append(_pick(composable.schedules, current_step))
        conds_list.append(row)

    if isinstance(tensors[0], dict):
        stacked = DictWithShape({k: stack_conds([t[k] for t in tensors]) for k in tensors[0]})
        return conds_list, stacked

    return conds_list, stack_conds(tensors).to(device=first.device, dtype=first.dtype)
