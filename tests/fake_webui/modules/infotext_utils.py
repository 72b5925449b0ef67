"""Fake of webui 1.10.1 modules/infotext_utils.py: quote/unquote and parse_generation_parameters' key/value splitting."""

import json
import re

re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # modules/infotext_utils.py:re_param


# modules/infotext_utils.py:quote
def quote(text):
    text_s = str(text)
    if ',' in text_s or '\n' in text_s or ':' in text_s:
        return json.dumps(text, ensure_ascii=False)
    return text


# modules/infotext_utils.py:unquote
def unquote(text):
    if not text or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


# modules/infotext_utils.py:parse_generation_parameters (the last-line "key: value, ..." part only)
def parse_generation_parameters(x: str, skip_fields=None):
    lines = x.strip().split("\n")
    res = {}
    prompt, negative, last = [], [], lines[-1] if lines else ""
    if len(re_param.findall(last)) < 3:
        lines.append(last)
        last = ""
    for line in lines[:-1]:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            negative.append(line[16:].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    res["Prompt"] = "\n".join(prompt)
    res["Negative prompt"] = "\n".join(negative)
    for k, v in re_param.findall(last):
        res[k] = unquote(v)
    for key in skip_fields or []:
        res.pop(key, None)
    return res
