# webui runs this file at start-up. Personalization Guidance needs only what
# webui itself ships (torch, safetensors, numpy, gradio), so there is nothing
# to install: this file exists so webui's installer finds nothing to do.
