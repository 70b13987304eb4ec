from cfs_repair.service import main

main()
