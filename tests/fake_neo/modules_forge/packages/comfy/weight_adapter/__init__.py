"""modules_forge/packages/comfy/weight_adapter (Neo 2.26): WeightAdapterBase (base.py) and
LoRAAdapter (lora.py :54-215), `adapters`.

Kept: LoRAAdapter.load reads "<x>.lora_up.weight"/"lora_down.weight" (and a "lora_mid"), alpha and
dora_scale passed in; `.weights = (up, down, alpha, mid, dora_scale, reshape)`; calculate_weight
adds, in chunks of 1024 output rows, (up @ down) * (strength * alpha / rank) computed in
intermediate_dtype, cast to the weight's dtype, to the weight it is given (in place)."""

import torch

from backend import memory_management


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
        if loaded_keys is None:
            loaded_keys = set()
        up, down, mid_name = f"{x}.lora_up.weight", f"{x}.lora_down.weight", f"{x}.lora_mid.weight"
        if up not in lora or down not in lora:
            return None
        mid = lora.get(mid_name)
        loaded_keys.update(k for k in (up, down, mid_name) if k in lora)
        return cls(loaded_keys, (lora[up], lora[down], alpha, mid, dora_scale, None))

    def calculate_weight(self, weight, key, strength, strength_model, offset, function, intermediate_dtype=torch.float32,
                         original_weight=None):
        v = self.weights
        mat1 = memory_management.cast_to_device(v[0], weight.device, intermediate_dtype)
        mat2 = memory_management.cast_to_device(v[1], weight.device, intermediate_dtype)
        if v[3] is not None or v[4] is not None or v[5] is not None:
            raise NotImplementedError("fake LoRAAdapter: mid, DoRA and reshape are not faked")
        alpha = v[2] / mat2.shape[0] if v[2] is not None else 1.0
        mat1_flat, mat2_flat = mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)
        out_dim = mat1_flat.shape[0]
        for i in range(0, out_dim, 1024):
            end = min(i + 1024, out_dim)
            diff_chunk = torch.mm(mat1_flat[i:end], mat2_flat)
            if strength * alpha != 1.0:
                diff_chunk.mul_(strength * alpha)
            target_shape = weight[i:end].shape
            weight[i:end] += function(diff_chunk.reshape(target_shape)).type(weight.dtype)
        return weight


adapters = [LoRAAdapter]
