from cfs_membership.service import main

main()
