"""Fake of webui 1.10.1's ``modules`` package (stable-diffusion-webui/modules/).

A small, independent re-implementation of the parts of AUTOMATIC1111 webui 1.10.1 an
always-on extension touches: put ``tests/fake_webui`` first on ``sys.path`` and
``from modules import shared, processing, ...`` works.  Each submodule's docstring names
the real file it stands for; each function/class carries a comment naming the real
function it mirrors.  Nothing here is copied from webui.
"""
