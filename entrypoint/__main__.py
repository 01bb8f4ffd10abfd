from entrypoint.train import main

main()
