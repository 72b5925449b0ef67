"""Fake of the small part of the ``gradio`` 3.41 package that webui 1.10.1 extension UIs use.

Not a webui file: it stands in for the third-party ``gradio`` package that webui 1.10.1
pins (gradio==3.41.2), so that modules/ui_components.py, modules/ui_common.py and a
script's ``ui()`` can run without a browser.  Every component created is recorded in
``created`` (in creation order) and knows its ``parent`` layout block; layout blocks
(Row, Column, Group, Accordion, Blocks, Tab) are context managers.  Event listeners
(``click``, ``change``, ...) are recorded in ``component.listeners`` and can be fired
with ``component.trigger(event, *inputs)``.

Test helpers: ``reset()`` forgets everything recorded; ``find(elem_id)`` looks a
component up by its elem_id.
"""

from __future__ import annotations

__version__ = "3.41.2"

created: list = []
"""every Block created since the last reset(), in creation order"""

_open_blocks: list = []


def reset():
    """test helper: forget all recorded components and open layout blocks"""
    created.clear()
    _open_blocks.clear()


def find(elem_id):
    """test helper: the last created component with this elem_id, or None"""
    for block in reversed(created):
        if block.elem_id == elem_id:
            return block
    return None


def update(**kwargs):
    # gradio 3.41: gradio.update (the dict form returned by event handlers)
    return {"__type__": "update", **kwargs}


class Block:
    # gradio 3.41: gradio.blocks.Block
    def __init__(self, *, elem_id=None, elem_classes=None, visible=True, render=True, **kwargs):
        self.elem_id = elem_id
        self.elem_classes = elem_classes
        self.visible = visible
        self.render = render
        self.kwargs = kwargs
        self.listeners = []
        self.children = []
        self.parent = _open_blocks[-1] if _open_blocks else None
        if self.parent is not None:
            self.parent.children.append(self)
        created.append(self)

    # fake-only: records a listener
    def _listen(self, event, fn=None, inputs=None, outputs=None, **kwargs):
        self.listeners.append({"event": event, "fn": fn, "inputs": inputs, "outputs": outputs, **kwargs})
        return self

    # gradio 3.41: gradio.events (EventListener methods)
    def click(self, fn=None, inputs=None, outputs=None, **kwargs):
        return self._listen("click", fn, inputs, outputs, **kwargs)

    # gradio 3.41: gradio.events Changeable.change
    def change(self, fn=None, inputs=None, outputs=None, **kwargs):
        return self._listen("change", fn, inputs, outputs, **kwargs)

    # gradio 3.41: gradio.events Inputable.input
    def input(self, fn=None, inputs=None, outputs=None, **kwargs):
        return self._listen("input", fn, inputs, outputs, **kwargs)

    # gradio 3.41: gradio.events Releaseable.release
    def release(self, fn=None, inputs=None, outputs=None, **kwargs):
        return self._listen("release", fn, inputs, outputs, **kwargs)

    # gradio 3.41: gradio.events Selectable.select
    def select(self, fn=None, inputs=None, outputs=None, **kwargs):
        return self._listen("select", fn, inputs, outputs, **kwargs)

    # gradio 3.41: gradio.blocks Dependency.then
    def then(self, fn=None, inputs=None, outputs=None, **kwargs):
        return self._listen("then", fn, inputs, outputs, **kwargs)

    def trigger(self, event, *args):
        """test helper: call every python listener registered for ``event``; returns their results"""
        return [x["fn"](*args) for x in self.listeners if x["event"] == event and x["fn"] is not None]

    # fake-only: readable repr
    def __repr__(self):
        return f"<fake gradio {type(self).__name__} elem_id={self.elem_id!r} label={getattr(self, 'label', None)!r}>"


class BlockContext(Block):
    # gradio 3.41: gradio.blocks.BlockContext (layout blocks are context managers)
    def __enter__(self):
        _open_blocks.append(self)
        return self

    # gradio 3.41: gradio.blocks.BlockContext.__exit__
    def __exit__(self, exc_type, exc_val, exc_tb):
        if _open_blocks and _open_blocks[-1] is self:
            _open_blocks.pop()
        return False


class Blocks(BlockContext):
    # gradio 3.41: gradio.Blocks
    def __init__(self, theme=None, analytics_enabled=None, mode="blocks", title="Gradio", css=None, **kwargs):
        super().__init__(**kwargs)
        self.title = title


class Row(BlockContext):
    # gradio 3.41: gradio.Row
    def __init__(self, *, variant="default", visible=True, elem_id=None, elem_classes=None, equal_height=True, **kwargs):
        super().__init__(visible=visible, elem_id=elem_id, elem_classes=elem_classes, **kwargs)
        self.variant = variant


class Column(BlockContext):
    # gradio 3.41: gradio.Column
    def __init__(self, *, scale=1, min_width=320, variant="default", visible=True, elem_id=None, elem_classes=None, **kwargs):
        super().__init__(visible=visible, elem_id=elem_id, elem_classes=elem_classes, **kwargs)
        self.scale, self.min_width, self.variant = scale, min_width, variant


class Group(BlockContext):
    # gradio 3.41: gradio.Group
    def __init__(self, *, visible=True, elem_id=None, **kwargs):
        super().__init__(visible=visible, elem_id=elem_id, **kwargs)


class Tab(BlockContext):
    # gradio 3.41: gradio.Tab
    def __init__(self, label=None, *, id=None, elem_id=None, elem_classes=None, **kwargs):
        super().__init__(elem_id=elem_id, elem_classes=elem_classes, **kwargs)
        self.label = label


class Accordion(BlockContext):
    # gradio 3.41: gradio.Accordion
    def __init__(self, label=None, open=True, *, visible=True, elem_id=None, elem_classes=None, **kwargs):
        super().__init__(visible=visible, elem_id=elem_id, elem_classes=elem_classes, **kwargs)
        self.label = label
        self.open = open


class Component(Block):
    # gradio 3.41: gradio.components.IOComponent
    def __init__(self, value=None, *, label=None, info=None, show_label=None, interactive=None, visible=True,
                 elem_id=None, elem_classes=None, **kwargs):
        super().__init__(visible=visible, elem_id=elem_id, elem_classes=elem_classes, **kwargs)
        self.value = value
        self.label = label
        self.info = info
        self.show_label = show_label
        self.interactive = interactive


class Slider(Component):
    # gradio 3.41: gradio.Slider
    def __init__(self, minimum=0, maximum=100, value=None, *, step=None, label=None, info=None, **kwargs):
        super().__init__(minimum if value is None else value, label=label, info=info, **kwargs)
        self.minimum, self.maximum, self.step = minimum, maximum, step


class Number(Component):
    # gradio 3.41: gradio.Number
    def __init__(self, value=None, *, label=None, info=None, precision=None, minimum=None, maximum=None, step=1, **kwargs):
        super().__init__(value, label=label, info=info, **kwargs)
        self.precision, self.minimum, self.maximum, self.step = precision, minimum, maximum, step


class Dropdown(Component):
    # gradio 3.41: gradio.Dropdown
    def __init__(self, choices=None, value=None, *, type="value", multiselect=None, allow_custom_value=False,
                 max_choices=None, label=None, info=None, **kwargs):
        super().__init__(value, label=label, info=info, **kwargs)
        self.choices = list(choices) if choices is not None else []
        self.type, self.multiselect, self.allow_custom_value = type, multiselect, allow_custom_value


class Radio(Component):
    # gradio 3.41: gradio.Radio
    def __init__(self, choices=None, value=None, *, type="value", label=None, info=None, **kwargs):
        super().__init__(value, label=label, info=info, **kwargs)
        self.choices = list(choices) if choices is not None else []
        self.type = type


class CheckboxGroup(Component):
    # gradio 3.41: gradio.CheckboxGroup
    def __init__(self, choices=None, value=None, *, type="value", label=None, info=None, **kwargs):
        super().__init__(list(value or []), label=label, info=info, **kwargs)
        self.choices = list(choices) if choices is not None else []
        self.type = type


class Checkbox(Component):
    # gradio 3.41: gradio.Checkbox
    def __init__(self, value=False, *, label=None, info=None, **kwargs):
        super().__init__(value, label=label, info=info, **kwargs)


class Textbox(Component):
    # gradio 3.41: gradio.Textbox
    def __init__(self, value="", *, lines=1, max_lines=20, placeholder=None, label=None, info=None, **kwargs):
        super().__init__(value, label=label, info=info, **kwargs)
        self.lines, self.max_lines, self.placeholder = lines, max_lines, placeholder


class HTML(Component):
    # gradio 3.41: gradio.HTML
    def __init__(self, value="", *, label=None, **kwargs):
        super().__init__(value, label=label, **kwargs)


class Markdown(Component):
    # gradio 3.41: gradio.Markdown
    def __init__(self, value="", *, visible=True, **kwargs):
        super().__init__(value, visible=visible, **kwargs)


class Button(Component):
    # gradio 3.41: gradio.Button
    def __init__(self, value="Run", *, variant="secondary", size=None, **kwargs):
        super().__init__(value, **kwargs)
        self.variant, self.size = variant, size


def Warning(message="Warning issued."):  # noqa: N802
    # gradio 3.41: gradio.Warning
    print(f"gradio warning: {message}")


def Info(message="Info issued."):  # noqa: N802
    # gradio 3.41: gradio.Info
    print(f"gradio info: {message}")
