"""Fake of webui 1.10.1 modules/ui_components.py (ToolButton, Form* wrappers, InputAccordion) on the fake gradio."""

import gradio as gr


class FormComponent:
    # modules/ui_components.py:FormComponent
    def get_expected_parent(self):
        return None


class ToolButton(FormComponent, gr.Button):
    # modules/ui_components.py:ToolButton
    def __init__(self, *args, **kwargs):
        classes = kwargs.pop("elem_classes", [])
        super().__init__(*args, elem_classes=["tool", *classes], **kwargs)

    # modules/ui_components.py:ToolButton.get_block_name
    def get_block_name(self):
        return "button"


class FormRow(FormComponent, gr.Row):
    # modules/ui_components.py:FormRow
    def get_block_name(self):
        return "row"


class FormColumn(FormComponent, gr.Column):
    # modules/ui_components.py:FormColumn
    def get_block_name(self):
        return "column"


class FormGroup(FormComponent, gr.Group):
    # modules/ui_components.py:FormGroup
    def get_block_name(self):
        return "group"


class FormHTML(FormComponent, gr.HTML):
    # modules/ui_components.py:FormHTML
    def get_block_name(self):
        return "html"


class InputAccordion(gr.Checkbox):
    # modules/ui_components.py:InputAccordion: a hidden checkbox (the input; its value is the open state) plus an accordion
    global_index = 0

    # modules/ui_components.py:InputAccordion.__init__
    def __init__(self, value, **kwargs):
        self.accordion_id = kwargs.get('elem_id')
        if self.accordion_id is None:
            self.accordion_id = f"input-accordion-{InputAccordion.global_index}"
            InputAccordion.global_index += 1

        super().__init__(value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
        self.change(fn=None, _js=f'function(checked){{ inputAccordionChecked("{self.accordion_id}", checked); }}', inputs=[self])
        self.accordion = gr.Accordion(**{**kwargs, "elem_id": self.accordion_id, "label": kwargs.get('label', 'Accordion'),
                                         "elem_classes": ['input-accordion'], "open": value})

    # modules/ui_components.py:InputAccordion.extra
    def extra(self):
        return gr.Column(elem_id=self.accordion_id + '-extra', elem_classes='input-accordion-extra', min_width=0)

    # modules/ui_components.py:InputAccordion.__enter__
    def __enter__(self):
        self.accordion.__enter__()
        return self

    # modules/ui_components.py:InputAccordion.__exit__
    def __exit__(self, exc_type, exc_val, exc_tb):
        self.accordion.__exit__(exc_type, exc_val, exc_tb)

    # modules/ui_components.py:InputAccordion.get_block_name
    def get_block_name(self):
        return "checkbox"
