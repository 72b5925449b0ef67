"""What every host shares: webui's front end, which Forge and reForge keep
(modules/processing.py, scripts, prompt_parser, sd_models, shared.opts), and the
sampling the two forks share (forks.py)."""
