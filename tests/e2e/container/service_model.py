"""Every CreateTrainingJob request the launcher builds, held to botocore's own service
model for SageMaker: required members, string lengths and patterns, enums, list and map
sizes, number ranges. botocore's ParamValidator checks types, required members and
minimums but no maximums, and moto checks nothing, while SageMaker refuses a request
over any of them (ContainerEntrypoint: at most 100 strings of at most 256 characters).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re

import pytest


@functools.cache
def _operation_input(operation: str):
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker")
    return model.operation_model(operation).input_shape


# The model's patterns are Java regexes, matched whole; these classes have no `re` spelling.
JAVA_CLASSES = {r"\p{Alnum}": "a-zA-Z0-9"}


@functools.cache
def _compiled(pattern: str) -> re.Pattern:
    letters = r"\p{L}\p{Z}\p{N}"
    if letters in pattern:  # [\p{L}\p{Z}\p{N}...]: any letter, space or digit
        pattern = pattern.replace("[" + letters, r"[\w\s").replace(letters, r"\w\s")
    for java, python in JAVA_CLASSES.items():
        pattern = pattern.replace(java, python)
    return re.compile(pattern, re.DOTALL)  # a construct left over fails the test: not skipped


def violations(params: dict, operation: str = "CreateTrainingJob") -> list[str]:
    """Each way `params` breaks the service model, as `path: what`; [] when none."""
    found: list[str] = []
    _walk(_operation_input(operation), params, operation, found)
    return found


def _walk(shape, value, path: str, found: list[str]) -> None:
    meta = shape.metadata
    kind = shape.type_name
    if kind == "structure":
        for name in shape.required_members:
            if name not in value:
                found.append(f"{path}.{name}: required")
        for name, member_value in value.items():
            if name not in shape.members:
                found.append(f"{path}.{name}: not in the model")
            else:
                _walk(shape.members[name], member_value, f"{path}.{name}", found)
        return
    if kind in ("list", "map"):
        size = len(value)
        if size < meta.get("min", 0) or ("max" in meta and size > meta["max"]):
            found.append(f"{path}: {size} entries, the model allows {meta.get('min', 0)}..{meta.get('max', '')}")
        if kind == "list":
            for i, item in enumerate(value):
                _walk(shape.member, item, f"{path}[{i}]", found)
        else:
            for k, v in value.items():
                _walk(shape.key, k, f"{path} key {k!r}", found)
                _walk(shape.value, v, f"{path}[{k!r}]", found)
        return
    if kind == "string":
        if len(value) < meta.get("min", 0) or ("max" in meta and len(value) > meta["max"]):
            found.append(f"{path}: {len(value)} characters, the model allows {meta.get('min', 0)}..{meta.get('max', '')}")
        if shape.enum and value not in shape.enum:
            found.append(f"{path}: {value!r} is not one of {shape.enum}")
        pattern = meta.get("pattern")
        if pattern and not _compiled(pattern).fullmatch(value):
            found.append(f"{path}: {value!r} does not match {pattern}")
        return
    if kind in ("integer", "long", "float", "double"):
        if ("min" in meta and value < meta["min"]) or ("max" in meta and value > meta["max"]):
            found.append(f"{path}: {value} is outside {meta.get('min')}..{meta.get('max')}")


@contextlib.contextmanager
def capturing():
    """Checks each CreateTrainingJob that leaves the launcher (dry runs too: their hook
    answers after this point) and collects its parameters."""
    from botocore.client import BaseClient

    seen: list[dict] = []
    real = BaseClient._make_api_call

    def checking(self, operation_name, api_params):
        if operation_name == "CreateTrainingJob":
            problems = violations(api_params)
            assert not problems, "SageMaker would refuse this request:\n" + "\n".join(problems)
            seen.append(copy.deepcopy(api_params))
        return real(self, operation_name, api_params)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BaseClient, "_make_api_call", checking)
        yield seen


@pytest.fixture
def checked_requests():
    with capturing() as seen:
        yield seen
