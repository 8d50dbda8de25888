from mmopt.cli import main

main()
