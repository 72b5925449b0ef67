"""extensions-builtin/xyz/lib_xyz/axis_format.py (Classic @ 1f95d717): the value formatters."""

import os


def format_value_add_label(p, opt, x):
    if type(x) == float:
        x = round(x, 8)
    return f"{opt.label}: {x}"


def format_remove_path(p, opt, x):
    return os.path.basename(x)
