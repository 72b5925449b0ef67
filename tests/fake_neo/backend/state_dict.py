"""backend/state_dict.py state_dict_prefix_replace (Neo 2.26 :92): keys renamed by prefix."""


def state_dict_prefix_replace(state_dict, replace_prefix, filter_keys=False):
    out = {} if filter_keys else state_dict
    for rp in replace_prefix:
        replace = [(a, "{}{}".format(replace_prefix[rp], a[len(rp):])) for a in state_dict if a.startswith(rp)]
        for x in replace:
            out[x[1]] = state_dict.pop(x[0])
    return out
