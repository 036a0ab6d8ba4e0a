"""``python -m convnext_cli``: Ctrl-C from the first moment ends with one line, exit 130."""

from convnext_cli.engine._interrupts import install_startup_handlers
from convnext_cli.startup import prepare

install_startup_handlers()  # before typer, rich and the commands are imported
prepare()  # closed standard streams, a malformed COLUMNS: before typer and rich read them

from convnext_cli.cli import main  # noqa: E402

main()
