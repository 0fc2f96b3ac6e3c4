from comfysim.cli import main

main()
