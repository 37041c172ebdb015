from optprof.cli.app import main

main()
