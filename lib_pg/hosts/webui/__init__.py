"""AUTOMATIC1111's webui 1.10.1 (1.6+): CFGDenoiser's stacked rows (routing.py
finds the weak rows by their conditioning), the Lora extension's state (loras.py)
and webui's sampling hooks (sampling.py)."""
