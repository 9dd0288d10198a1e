"""vLLM < 0.32 has no ``AttentionBackendEnum.register``: add a member the way 0.32 itself does."""

from enum import Enum


def add_enum_member(enum_cls: type[Enum], name: str, value: str) -> Enum:
    if not name.isidentifier() or name in enum_cls.__members__:
        raise ValueError(f"cannot add attention backend name {name!r}")
    member = object.__new__(enum_cls)
    member._name_ = name
    member._value_ = value
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member
