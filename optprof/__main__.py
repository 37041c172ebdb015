from optprof.cli import main

main()
