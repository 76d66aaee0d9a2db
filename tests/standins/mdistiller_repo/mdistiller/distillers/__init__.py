from ._base import Distiller, Vanilla
from .AT import AT

distiller_dict = {"NONE": Vanilla, "AT": AT}
