"""The one parser of GCP model names: ``<backbone>_gcp_<method>[.<tag>]``.

``backbone`` is what precedes the last ``_gcp_`` (``resnet50``, ``resnet50_ls1``, ``convnext_tiny``, any timm model
name), ``method`` a key of ``timm_gcp.METHODS`` or the name of another head (``dropcov``, ``sot``: see
``timm_gcp.models._head.HEAD_KINDS``) and ``tag`` timm's pretrained tag (``tv_in1k``), '' when absent.
"""
import dataclasses
from typing import Optional

from ..functional import METHODS
from ._head import head_names

__all__ = ['GcpName', 'parse_gcp_name', 'is_gcp_name']

_SEP = '_gcp_'


@dataclasses.dataclass(frozen=True)
class GcpName:
    """A parsed GCP model name."""
    backbone: str
    method: str
    tag: str = ''

    @property
    def family(self) -> str:
        """``<backbone>_gcp``: the models of every method on this backbone (the zoo registry's family key)."""
        return f'{self.backbone}_gcp'

    @property
    def arch(self) -> str:
        """``<backbone>_gcp_<method>``, without the tag."""
        return f'{self.backbone}{_SEP}{self.method}'

    @property
    def name(self) -> str:
        """The full name, ``arch`` plus ``.tag`` when there is one."""
        return f'{self.arch}.{self.tag}' if self.tag else self.arch

    def with_method(self, method: str) -> 'GcpName':
        """The same backbone and tag with another method.

        Raises:
            ValueError: ``method`` is neither a key of ``timm_gcp.METHODS`` nor a head name.
        """
        _check_method(method, f'{self.backbone}{_SEP}{method}')
        return dataclasses.replace(self, method=method)

    def __str__(self) -> str:
        return self.name


def _check_method(method: str, name: str) -> None:
    if method not in head_names():
        raise ValueError(f'{name!r}: unknown matrix square-root method {method!r} after {_SEP!r} (and not a head '
            f'either); valid methods: {", ".join(METHODS)}; heads without a root: '
            f'{", ".join(head_names()[len(METHODS):])}')


def is_gcp_name(name: str) -> bool:
    """Whether ``name`` has the ``<backbone>_gcp_<method>`` form (the method is not checked; hub and directory
    sources such as ``hf-hub:…`` are not model names)."""
    return isinstance(name, str) and ':' not in name and _SEP in name


def parse_gcp_name(name: str) -> Optional[GcpName]:
    """Split ``<backbone>_gcp_<method>[.<tag>]``; None for a name without ``_gcp_`` (not a GCP model name).

    Hub or directory sources (``hf-hub:``, ``local-dir:``) are not model names and give None: their architecture is in
    their ``config.json``.

    Raises:
        ValueError: an empty backbone, or a method that is neither a key of ``timm_gcp.METHODS`` nor a head name
            (the message lists the valid ones).
    """
    if not isinstance(name, str) or ':' in name or _SEP not in name:
        return None
    arch, _, tag = name.partition('.')
    backbone, _, method = arch.rpartition(_SEP)
    if not backbone:
        raise ValueError(f'{name!r}: no backbone name before {_SEP!r}')
    _check_method(method, name)
    return GcpName(backbone, method, tag)
