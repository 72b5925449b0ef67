"""Fake of webui 1.10.1 modules/ui_common.py: create_refresh_button on the fake gradio.

The returned ToolButton has a recorded "click" listener; ``button.trigger("click")`` runs
the refresh (refresh_method(), then the refreshed args set as attributes on the
component(s)) and returns gradio.update dicts like webui's handler.
"""

import gradio as gr

from modules.ui_components import ToolButton

refresh_symbol = '\U0001f504'  # 🔄


# modules/ui_common.py:create_refresh_button
def create_refresh_button(refresh_component, refresh_method, refreshed_args, elem_id):
    components = refresh_component if isinstance(refresh_component, list) else [refresh_component]
    label = next((c.label for c in components if getattr(c, 'label', None) is not None), None)

    def refresh():
        refresh_method()
        args = refreshed_args() if callable(refreshed_args) else refreshed_args
        for k, v in args.items():
            for comp in components:
                setattr(comp, k, v)
        updates = [gr.update(**(args or {})) for _ in components]
        return updates if len(components) > 1 else updates[0]

    button = ToolButton(value=refresh_symbol, elem_id=elem_id, tooltip=f"{label}: refresh" if label else "Refresh")
    button.click(fn=refresh, inputs=[], outputs=components)
    return button
