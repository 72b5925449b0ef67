"""backend/args.py: `dynamic_args` (Neo 2.26 :145-175), the flags PG reads: nunchaku (an SVDQ
UNet loaded) and online_lora (LoRAs merged in each layer's forward)."""


class DynamicArgs:
    def __init__(self):
        self.online_lora = False
        self.nunchaku = False
        self.ops = None


dynamic_args = DynamicArgs()
