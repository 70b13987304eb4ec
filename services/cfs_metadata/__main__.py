from cfs_metadata.service import main

main()
