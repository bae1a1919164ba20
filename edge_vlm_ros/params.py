"""Declare a node's ROS parameters from a config dataclass and build the config from them."""

from __future__ import annotations

from typing import TypeVar

from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.exceptions import ParameterUninitializedException
from rclpy.node import Node

from .core.config import field_descriptions

C = TypeVar("C")


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
    values = {}
    for name, (default, description) in field_descriptions(cls).items():
        desc = ParameterDescriptor(description=description, type=_type_of(default))
        if isinstance(default, list) and not default:
            from rclpy.parameter import Parameter

            node.declare_parameter(name, Parameter.Type.STRING_ARRAY, desc)
            try:
                values[name] = list(node.get_parameter(name).value or [])
            except ParameterUninitializedException:
                values[name] = []
            continue
        node.declare_parameter(name, default, desc)
        value = node.get_parameter(name).value
        values[name] = list(value) if isinstance(default, list) else value
    return cls(**values)
