"""Declare a node's ROS parameters from a config dataclass and build the config from them."""

from __future__ import annotations

from typing import TypeVar

from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.exceptions import ParameterUninitializedException
from rclpy.node import Node

from .core.config import field_descriptions

C = TypeVar("C")


def _array_type(annotation: str) -> int:
    """ROS array type of a list field from its annotation ('list[float]', 'list[int]', 'list[str]')."""
    if "float" in annotation:
        return ParameterType.PARAMETER_DOUBLE_ARRAY
    if "int" in annotation:
        return ParameterType.PARAMETER_INTEGER_ARRAY
    return ParameterType.PARAMETER_STRING_ARRAY


def _type_of(default) -> int:
    if isinstance(default, bool):
        return ParameterType.PARAMETER_BOOL
    if isinstance(default, int):
        return ParameterType.PARAMETER_INTEGER
    if isinstance(default, float):
        return ParameterType.PARAMETER_DOUBLE
    if isinstance(default, list):
        return ParameterType.PARAMETER_STRING_ARRAY
    return ParameterType.PARAMETER_STRING


def declare_config(node: Node, cls: type[C]) -> C:
    """Declare every field of `cls` as a parameter (with its description) and return the config."""
    import enum
    from dataclasses import fields

    annotations = {f.name: str(f.type) for f in fields(cls)}  # type: ignore[arg-type]
    values = {}
    for name, (default, description) in field_descriptions(cls).items():
        if isinstance(default, enum.Enum):
            default = default.value
        ptype = _array_type(annotations[name]) if isinstance(default, list) else _type_of(default)
        desc = ParameterDescriptor(description=description, type=ptype)
        if isinstance(default, list) and not default:
            from rclpy.parameter import Parameter

            kind = {ParameterType.PARAMETER_DOUBLE_ARRAY: Parameter.Type.DOUBLE_ARRAY,
                    ParameterType.PARAMETER_INTEGER_ARRAY: Parameter.Type.INTEGER_ARRAY}.get(
                        ptype, Parameter.Type.STRING_ARRAY)
            node.declare_parameter(name, kind, desc)
            try:
                values[name] = list(node.get_parameter(name).value or [])
            except ParameterUninitializedException:
                values[name] = []
            continue
        node.declare_parameter(name, default, desc)
        value = node.get_parameter(name).value
        values[name] = list(value) if isinstance(default, list) else value
    return cls(**values)


def read_config(node: Node, cls: type[C]) -> C:
    """The config built from the current values of parameters declared by declare_config (a managed
    node's configure reads them again, so a `ros2 param set` before configure takes effect)."""
    values = {}
    for name, (default, _description) in field_descriptions(cls).items():
        try:
            value = node.get_parameter(name).value
        except ParameterUninitializedException:
            value = None
        values[name] = list(value or []) if isinstance(default, list) else value
    return cls(**values)
