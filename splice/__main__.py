from splice.cli.app import main

main()
