from cfs_chunkstore.service import main

main()
