"""ldm_patched/modules/weight_adapter: WeightAdapterBase and LoRAAdapter (lora.py:58-230), `adapters`.

Kept: LoRAAdapter.load reads "<x>.lora_up.weight"/"lora_down.weight" (alpha passed in),
`.weights = (up, down, alpha, mid, dora_scale, reshape)`, calculate_weight adds
strength * alpha / rank * up @ down (computed in intermediate_dtype) to the weight it is given.
"""

import torch


class WeightAdapterBase:
    name: str
    loaded_keys: set
    weights: tuple


class LoRAAdapter(WeightAdapterBase):
    name = "lora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        up, down = f"{x}.lora_up.weight", f"{x}.lora_down.weight"
        if up not in lora or down not in lora:
            return None
        return cls({up, down}, (lora[up], lora[down], alpha, None, dora_scale, None))

    def calculate_weight(self, weight, key, strength, strength_model, offset, function, intermediate_dtype=torch.float32,
                         original_weight=None):
        v = self.weights
        mat1 = v[0].to(weight.device, intermediate_dtype)
        mat2 = v[1].to(weight.device, intermediate_dtype)
        alpha = v[2] / mat2.shape[0] if v[2] is not None else 1.0
        lora_diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1))
        weight += function(((strength * alpha) * lora_diff).reshape(weight.shape)).type(weight.dtype)
        return weight


adapters = [LoRAAdapter]
