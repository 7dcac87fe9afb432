"""EnVLF: remote-sensing text-image retrieval with vision-language fusion."""

__version__ = "0.1.0"
