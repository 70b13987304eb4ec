from cfs_georep.service import main

main()
