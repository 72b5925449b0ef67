"""modules_forge/packages/huggingface_guess/model_list.py (Neo 2.26): ModelType (:10-14) and SDXL's
model_type (:205-209), inpaint_model (:202-203) and process_clip_state_dict (:211-217): sgm text-encoder
keys renamed to `clip_l.` / `clip_g.`, OpenCLIP converted to the Hugging Face layout (its projection
transposed into `clip_g.transformer.text_projection.weight`)."""

from enum import Enum

from . import utils


class ModelType(Enum):
    EPS = 1
    V_PREDICTION = 2
    FLUX = 3
    FLOW = 4


class SDXL:
    unet_config = {"in_channels": 4}

    def inpaint_model(self):
        return self.unet_config.get("in_channels", -1) > 4

    def model_type(self, state_dict: dict):
        if "v_pred" in state_dict:
            return ModelType.V_PREDICTION
        else:
            return ModelType.EPS

    def process_clip_state_dict(self, state_dict):
        replace_prefix = {
            "conditioner.embedders.0.transformer.text_model": "clip_l.transformer.text_model",
            "conditioner.embedders.1.model.": "clip_g.",
        }
        state_dict = utils.state_dict_prefix_replace(state_dict, replace_prefix, filter_keys=True)
        return utils.clip_text_transformers_convert(state_dict, "clip_g.", "clip_g.transformer.")
