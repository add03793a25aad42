"""The module's parameter node: Slicer's ``parameterNodeWrapper`` over ``panel.PARAMETERS`` (saved with the scene),
and the ``{parameter: widget}`` binding read from the .ui's ``SlicerParameterName`` properties."""

from typing import Annotated

import qt
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper

from .panel import PARAMETERS

#: The dynamic property of a .ui widget that names the parameter it shows (Slicer's parameterNodeWrapper).
PARAMETER_NAME_PROPERTY = "SlicerParameterName"


def _annotation(parameter):
    return Annotated[parameter.type, WithinRange(*parameter.range)] if parameter.range else parameter.type


SSMSRRegistrationParameterNode = parameterNodeWrapper(type("SSMSRRegistrationParameterNode", (), {
    "__doc__": "Module state saved with the scene; see SSMSRRegistrationLib.gui.panel.PARAMETERS.",
    "__module__": __name__,
    "__annotations__": {name: _annotation(parameter) for name, parameter in PARAMETERS.items()},
    **{name: parameter.default for name, parameter in PARAMETERS.items() if parameter.default is not None},
}))


def boundWidgets(panelWidget) -> dict:
    """{parameter name: widget} of the panel's widgets that carry a SlicerParameterName property.

    ``connectParametersToGui(boundWidgets(...))`` returns a tag that ``disconnectGui`` honours on every supported
    Slicer (``connectGui`` returns None before Slicer 5.10).
    """
    return {widget.property(PARAMETER_NAME_PROPERTY): widget for widget in panelWidget.findChildren(qt.QWidget)
            if widget.property(PARAMETER_NAME_PROPERTY)}
