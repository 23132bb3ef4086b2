"""Stand-in for ``slicer.i18n``: no translation, text passes through."""


def tr(text):
    return text


def translate(context, text):
    return text
