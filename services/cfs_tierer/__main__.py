from cfs_tierer.service import main

main()
