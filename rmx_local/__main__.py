from rmx_local.cli import main

main()
