"""extensions-builtin/xyz/lib_xyz/builtins.py (Classic @ 1f95d717): `builtin_options`, the axis list
xyz_grid.py uses as its `axis_options` (two of its entries here)."""

from .classes import AxisOption


def do_nothing(p, x, xs):  # lib_xyz/axis_application.py
    pass


builtin_options = [
    AxisOption("Nothing", str, do_nothing),
    AxisOption("CFG Scale", float, lambda p, x, xs: setattr(p, "cfg_scale", x)),
]
