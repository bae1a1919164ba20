"""Declare a node's ROS parameters from a config dataclass, build the config from them, and decide
what a later `ros2 param set` does.

Every field of a config dataclass is one parameter, with its description in the ParameterDescriptor.
A field is either live or read-only (core.config.param's `live`, shown in the descriptor's
additional_constraints and by `ros2 param describe`):

- live: the node applies a new value between requests. The new config is built from the running one
  with dataclasses.replace, so its __post_init__ validation runs, and handed to the node's apply
  function, which may refuse it too (a codebook that does not fit the model, a split point beyond the
  model's blocks). Any refusal is the set's failure reason; the parameter keeps its old value and the
  node keeps serving with its old configuration.
- read-only: a set is refused with the reason, while the node runs. A managed (lifecycle) node that
  is not configured (its `configured` attribute is False) takes any value: configure reads them.

Several parameters set in one call (`set_parameters_atomically`) are judged together: change
split_point none and codec jpeg, or low and high, in one call.

Every refusal is counted per node and kind (read_only, invalid, not_applied) with its last reason
(`parameter_refusals`); the node's /diagnostics status shows them (diagnostics.py).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import traceback
import weakref
from typing import Any, Callable, TypeVar

from rcl_interfaces.msg import ParameterDescriptor, ParameterType, SetParametersResult
from rclpy.exceptions import ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter

from .core.config import field_descriptions, live_fields

C = TypeVar("C")

READ_ONLY_REASON = "read-only: set it in the params file and restart, or reconfigure the lifecycle node"
LIVE_NOTE = "live: a new value takes effect between requests (ros2 param set)"
READ_ONLY_NOTE = (f"{READ_ONLY_REASON} (a set while the node runs is refused)")

# apply(new_config, changed_names): raise ValueError (or RuntimeError) to refuse, with the reason.
ApplyLive = Callable[[Any, frozenset], None]


# Each node's on-set checks (one per declared config class), for its refusal counters.
_CHECKS: "weakref.WeakKeyDictionary[Node, list[LiveParameters]]" = weakref.WeakKeyDictionary()


def parameter_refusals(node: Node) -> tuple[dict[str, int], str]:
    """(refused sets by kind, the newest refusal's reason) over every config class `node` declared
    with declare_config; ({}, "") for a node without any."""
    refused: collections.Counter[str] = collections.Counter()
    last, last_n = "", -1
    for check in _CHECKS.get(node, []):
        refused.update(check.refused)
        if check.last_reason and check.last_seq > last_n:
            last, last_n = check.last_reason, check.last_seq
    return dict(refused), last


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


def declare_config(node: Node, cls: type[C], apply_live: ApplyLive | None = None) -> C:
    """Declare every field of `cls` as a parameter (with its description) and return the config.

    Registers the on-set-parameters check described in the module docstring. `apply_live` is the
    node's way to apply a new config whose live fields changed; without one, live fields are refused
    like read-only ones (nothing would apply them).
    """
    annotations = {f.name: str(f.type) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    live = live_fields(cls) if apply_live is not None else frozenset()
    values = {}
    for name, (default, description) in field_descriptions(cls).items():
        if isinstance(default, enum.Enum):
            default = default.value
        ptype = _array_type(annotations[name]) if isinstance(default, list) else _type_of(default)
        desc = ParameterDescriptor(description=description, type=ptype,
                                   additional_constraints=LIVE_NOTE if name in live else READ_ONLY_NOTE)
        if isinstance(default, list) and not default:
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
    cfg = cls(**values)
    check = LiveParameters(node, cls, live, apply_live)
    _CHECKS.setdefault(node, []).append(check)
    node.add_on_set_parameters_callback(check)
    return cfg


def _value(p: Parameter, default: Any) -> Any:
    return list(p.value or []) if isinstance(default, list) else p.value


class LiveParameters:
    """The on-set-parameters callback of one config class on one node (see the module docstring)."""

    _seq = 0       # refusals so far in this process (orders the "last" reason across classes)

    def __init__(self, node: Node, cls: type, live: frozenset[str], apply_live: ApplyLive | None) -> None:
        self.node, self.cls, self.live, self.apply_live = node, cls, live, apply_live
        self.defaults = {n: d for n, (d, _) in field_descriptions(cls).items()}
        self.refused: collections.Counter[str] = collections.Counter()   # read_only, invalid, not_applied
        self.last_reason = ""          # the newest refusal's reason
        self.last_seq = 0              # orders refusals across a node's config classes
        self.applied = 0

    def current(self) -> Any:
        """The running config: built from the parameters' values, which every accepted set keeps equal
        to what the node applied."""
        values = {}
        for name, default in self.defaults.items():
            try:
                values[name] = _value(self.node.get_parameter(name), default)
            except ParameterUninitializedException:
                values[name] = []
        return self.cls(**values)

    def __call__(self, params: list[Parameter]) -> SetParametersResult:
        mine = [p for p in params if p.name in self.defaults]
        if not mine or getattr(self.node, "configured", True) is False:
            return SetParametersResult(successful=True)
        read_only = [p.name for p in mine if p.name not in self.live]
        if read_only:
            return self._refuse("read_only", f"{', '.join(read_only)}: {READ_ONLY_REASON}")
        asked = ", ".join(f"{p.name}={_value(p, self.defaults[p.name])!r}" for p in mine)
        try:
            old = self.current()
            new = dataclasses.replace(old, **{p.name: _value(p, self.defaults[p.name]) for p in mine})
        except Exception as e:      # __post_init__'s ValueError, a wrong type: the set's reason
            return self._refuse("invalid", f"{asked} refused: {e}")
        changed = frozenset(p.name for p in mine if getattr(new, p.name) != getattr(old, p.name))
        if not changed:
            return SetParametersResult(successful=True)
        try:
            self.apply_live(new, changed)    # type: ignore[misc]
        except Exception as e:
            # Whatever the node could not apply (a split the model cannot serve, a codebook of another
            # model, a file that does not load) is the set's reason: escaping from here it would end
            # the node's executor instead. A ValueError is a refusal; anything else is logged with
            # its traceback too.
            why = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            if not isinstance(e, ValueError):
                self.node.get_logger().error(f"applying {asked} failed:\n{traceback.format_exc()}")
            return self._refuse("not_applied", f"{asked} refused, the node keeps its previous configuration: {why}")
        self.applied += 1
        self.node.get_logger().info(f"live parameter change applied: {asked}")
        return SetParametersResult(successful=True)

    def _refuse(self, kind: str, reason: str) -> SetParametersResult:
        self.refused[kind] += 1
        LiveParameters._seq += 1
        self.last_reason, self.last_seq = reason, LiveParameters._seq
        self.node.get_logger().warning(f"parameter set refused: {reason}", throttle_duration_sec=1.0)
        return SetParametersResult(successful=False, reason=reason)


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
