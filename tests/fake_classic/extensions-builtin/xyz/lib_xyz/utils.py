"""extensions-builtin/xyz/lib_xyz/utils.py (Classic @ 1f95d717): boolean_choice lives here now."""


def boolean_choice(reverse: bool = False):
    def choice():
        return ["False", "True"] if reverse else ["True", "False"]

    return choice
