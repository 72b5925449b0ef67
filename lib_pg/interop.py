"""What other extensions carry in the tensors PG hands back to the host.

Pure torch: the adapters call these where PG replaces a host tensor that
another extension may have annotated.
"""

import torch

# sd-webui-controlnet (scripts/hook.py, mark_prompt_context) prepends one token
# to every prompt's conditioning, all +1024 for a conditional prompt and all
# −1024 for an unconditional one, and strips it again inside the UNet: that is
# how its "ControlNet is more important" mode tells the rows apart.
CONTROLNET_MARK = 1024.0
_MARK_TOLERANCE = 1e-3


def controlnet_marks(context: torch.Tensor):
    """The marker token of every row ([rows, 1, width]), or None if the rows
    are not all marked."""
    if context.dim() != 3 or context.shape[1] == 0:
        return None
    first = context[:, :1].float()
    if bool(((first.abs() - CONTROLNET_MARK).abs() < _MARK_TOLERANCE).all()):
        return context[:, :1]
    return None


def carry_marks(original, replacement):
    """`replacement` with the marker tokens that `original` carries (same rows;
    a dict conditioning carries them in its 'crossattn' tensor), so that the
    extension sees the rows as it marked them."""
    if isinstance(original, dict):
        if not isinstance(replacement, dict):
            return replacement
        return {**replacement, "crossattn": carry_marks(original["crossattn"], replacement["crossattn"])}
    marks = controlnet_marks(original)
    if marks is None or controlnet_marks(replacement) is not None or marks.shape[0] != replacement.shape[0]:
        return replacement
    return torch.cat([marks.to(device=replacement.device, dtype=replacement.dtype), replacement], dim=1)
