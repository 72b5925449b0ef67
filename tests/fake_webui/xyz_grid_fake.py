"""Stands for webui 1.10.1's scripts/xyz_grid.py (loaded by webui as the module
"xyz_grid.py"): the AxisOption class extensions append to `axis_options`, the
helper functions they use, and the cell loop's order and per-cell copy of p."""

import os
from copy import copy

from modules import processing


def format_value_add_label(p, opt, x):  # scripts/xyz_grid.py:format_value_add_label
    if type(x) == float:
        x = round(x, 8)
    return f"{opt.label}: {x}"


def format_remove_path(p, opt, x):  # scripts/xyz_grid.py:format_remove_path
    return os.path.basename(x)


def boolean_choice(reverse: bool = False):  # scripts/xyz_grid.py:boolean_choice
    def choice():
        return ["False", "True"] if reverse else ["True", "False"]
    return choice


def do_nothing(p, x, xs):  # scripts/xyz_grid.py:do_nothing
    pass


class AxisOption:  # scripts/xyz_grid.py:AxisOption
    def __init__(self, label, type, apply, format_value=format_value_add_label, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label = label
        self.type = type
        self.apply = apply
        self.format_value = format_value
        self.confirm = confirm
        self.cost = cost
        self.prepare = prepare
        self.choices = choices


axis_options = [AxisOption("Nothing", str, do_nothing),
                AxisOption("CFG Scale", float, lambda p, x, xs: setattr(p, "cfg_scale", x))]


def run_grid(p, x_opt, xs, y_opt, ys):
    """The cells of scripts/xyz_grid.py Script.run for two axes: values typed by
    the option's type, confirm() called, the costlier axis in the outer loop,
    and each cell a shallow copy of p with both options applied."""
    xs, ys = [x_opt.type(x) for x in xs], [y_opt.type(y) for y in ys]
    for opt, values in ((x_opt, xs), (y_opt, ys)):
        if opt.confirm:
            opt.confirm(p, values)
    cells = {}
    outer_is_x = x_opt.cost > y_opt.cost
    order = ([(ix, iy) for ix in range(len(xs)) for iy in range(len(ys))] if outer_is_x
             else [(ix, iy) for iy in range(len(ys)) for ix in range(len(xs))])
    for ix, iy in order:
        pc = copy(p)
        x_opt.apply(pc, xs[ix], xs)
        y_opt.apply(pc, ys[iy], ys)
        cells[(ix, iy)] = processing.process_images(pc)
    return cells
