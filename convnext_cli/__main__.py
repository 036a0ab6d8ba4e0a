from convnext_cli.cli import main

main()
