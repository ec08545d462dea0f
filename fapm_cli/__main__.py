from fapm_cli.cli.app import main

main()
