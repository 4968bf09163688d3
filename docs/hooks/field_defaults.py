"""A griffe extension for the API reference: the real constructor defaults of lorax's dataclass nodes.

lorax declares node fields through small helpers around ``dataclasses.field``
(``trained_field(group="a")``, ``static_field(1.0)``, ...). griffe recognises only
``dataclasses.field`` itself, so without this the signatures would show the helper calls as
defaults. Here a helper call becomes what it means: its ``default`` (the first argument of the
static helpers), or no default at all (a required field).
"""

from __future__ import annotations

from typing import Any

import griffe

#: helper name -> whether its first positional argument is the default
HELPERS = {"frozen_field": False, "trained_field": False, "static_field": True, "_static": True}


def real_default(default: Any) -> Any:
    """The default a field helper call stands for; None when the field is required.

    >>> expr = griffe.ExprCall(griffe.ExprName("static_field"), ["1.0"])
    >>> real_default(expr)
    '1.0'
    >>> real_default(griffe.ExprCall(griffe.ExprName("trained_field"), [griffe.ExprKeyword("group", "'a'")])) is None
    True
    >>> real_default(griffe.ExprCall(griffe.ExprName("extend.static_field"), ["False"]))
    'False'

    """
    name = str(default.function).rsplit(".", 1)[-1] if isinstance(default, griffe.ExprCall) else None
    if name not in HELPERS:  # a helper is also called through its module (``extend.trained_field``)
        return default
    positional = [arg for arg in default.arguments if not isinstance(arg, griffe.ExprKeyword)]
    keywords = {arg.name: arg.value for arg in default.arguments if isinstance(arg, griffe.ExprKeyword)}
    if "default" in keywords:
        return keywords["default"]
    return positional[0] if HELPERS[name] and positional else None


def fix_classes(obj: griffe.Object) -> None:
    """Rewrite the helper calls in ``obj``'s classes: in their fields' values (read by griffe's
    dataclasses extension when it runs after this one) and in constructors already built."""
    for member in obj.members.values():
        if member.is_alias:
            continue
        if member.is_attribute and obj.is_class:
            member.value = real_default(member.value)
        if member.is_function and member.name == "__init__":
            for parameter in member.parameters:
                parameter.default = real_default(parameter.default)
        if member.is_module or member.is_class:
            fix_classes(member)


class FieldDefaults(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        fix_classes(pkg)
