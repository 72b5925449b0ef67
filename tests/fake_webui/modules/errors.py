"""Fake of webui 1.10.1 modules/errors.py: report()/display() print like webui and record.

Test helper: ``reported`` holds ``(message, exception)`` for every report()/display()
call, so a test can assert that webui swallowed (only logged) an exception.
"""

import sys
import textwrap
import traceback

exception_records = []
reported = []
"""test helper: (message, exception or None) for each report()/display() call"""


# modules/errors.py:record_exception
def record_exception():
    _, e, tb = sys.exc_info()
    if e is None or (exception_records and exception_records[-1]["exception"] == str(e)):
        return
    exception_records.append({"exception": str(e), "traceback": traceback.format_tb(tb)})
    del exception_records[:-5]


# modules/errors.py:report
def report(message: str, *, exc_info: bool = False) -> None:
    record_exception()
    reported.append((message, sys.exc_info()[1] if exc_info else None))
    for line in message.splitlines():
        print("***", line, file=sys.stderr)
    if exc_info:
        print(textwrap.indent(traceback.format_exc(), "    "), file=sys.stderr)
        print("---", file=sys.stderr)


# modules/errors.py:display
def display(e: Exception, task, *, full_traceback=False):
    record_exception()
    reported.append((str(task), e))
    print(f"{task or 'error'}: {type(e).__name__}", file=sys.stderr)
    print(textwrap.indent("".join(traceback.format_exception(e)), "    "), file=sys.stderr)


# modules/errors.py:run
def run(code, task):
    try:
        code()
    except Exception as e:
        display(task, e)
