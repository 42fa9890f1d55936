from samout_edge.cli.app import main

main()
