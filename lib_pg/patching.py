"""The one mechanism through which PG changes live modules.

Every change (an instance attribute, a hook, a parameter swapped in for one
call) is recorded with what it replaced and undone in reverse order, so the
user's model comes back bit for bit on success, exception, interrupt and skip.
"""

from contextlib import contextmanager

import torch

_ABSENT = object()


class LivePatch:
    """A stack of reversible changes to live objects; `restore()` undoes them all."""

    def __init__(self):
        self._undo = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False

    def set_attribute(self, obj, name, value):
        """Set an instance attribute, remembering whether the instance had its own."""
        previous = obj.__dict__.get(name, _ABSENT)
        obj.__dict__[name] = value
        self._undo.append(lambda: _put_back(obj.__dict__, name, previous))

    def keep_handle(self, handle):
        """Own a torch hook handle (or anything with .remove())."""
        self._undo.append(handle.remove)

    def restore(self):
        errors = []
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception as e:  # keep undoing: a half-restored model is the worst outcome
                errors.append(e)
        if errors:
            raise errors[0]


def _put_back(mapping, key, previous):
    if previous is _ABSENT:
        mapping.pop(key, None)
    else:
        mapping[key] = previous


class swapped_parameters:  # noqa: N801 (used like the context-manager functions around it)
    """Put other tensors in place of module parameters for the duration of a call.

    `swaps` is an iterable of (module, parameter name, tensor). The module's own
    Parameter objects are put back untouched afterwards (no copy into them), so
    the live weights cannot change, whatever the wrapped call does.

    A class rather than a generator-based context manager: it runs around every
    routed layer call, and this form costs less per call.
    """

    __slots__ = ("_swaps", "_saved")

    def __init__(self, swaps):
        self._swaps = swaps
        self._saved = []

    def __enter__(self):
        saved = self._saved
        try:
            for module, name, tensor in self._swaps:
                params = module._parameters
                saved.append((params, name, params[name]))
                params[name] = tensor
        except BaseException:
            self._put_back()
            raise
        return self

    def __exit__(self, *exc):
        self._put_back()
        return False

    def _put_back(self):
        saved = self._saved
        while saved:
            params, name, original = saved.pop()
            params[name] = original


@contextmanager
def swapped_attributes(changes):
    """Set plain attributes for the duration of a call and put the previous
    values back, whatever the call does. `changes`: (object, name, value)."""
    saved = []
    try:
        for obj, name, value in changes:
            saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, previous in reversed(saved):
            setattr(obj, name, previous)


def module_state_fingerprint(module):
    """Everything about a module tree that PG must leave as it found it:
    parameter/buffer identities and bytes, hooks, instance-level forwards.

    Returned as a comparable tuple (tests compare before/after bit for bit).
    """
    import hashlib  # noqa: PLC0415 (only tests and checks need it)

    digest = hashlib.sha256()
    for name, tensor in list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False)):
        digest.update(name.encode())
        digest.update(str((tensor.dtype, tuple(tensor.shape), id(tensor))).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    structure = []
    for name, sub in module.named_modules(remove_duplicate=False):
        structure.append((
            name,
            tuple(sub._forward_hooks), tuple(sub._forward_pre_hooks),
            "forward" in sub.__dict__,
            tuple(sorted(sub._parameters)),
        ))
    return digest.hexdigest(), tuple(structure)
