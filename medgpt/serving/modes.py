"""Inference modes (serve, chat, predict, webui) register here: `@register("serve")` with `fn(cfg, run_dir)`."""
