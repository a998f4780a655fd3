/*
 * test_damaged.c - store/ on a damaged data directory: a clear error (CAP_ECORRUPT /
 * CAP_EVERSION / -errno), never a crash. Cases: garbage data.mdb, a file of another format
 * (SQLite header), a truncated data.mdb, a data directory that is a regular file, a path under a
 * regular file, a read-only open of an empty directory.
 */
#include "check.h"
#include "store.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

static void write_file(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    CHECK(fwrite(data, 1, len, f) == len);
    CHECK(fclose(f) == 0);
}

static void expect_open_fails(const char *dir, int err)
{
    store_env_t *env = NULL;
    CHECK_ERR(store_env_open(dir, NULL, &env), err);
    CHECK(env == NULL);
}

int main(void)
{
    char *base = check_tmpdir("store-damaged");
    char dir[4096], path[4200];

    /* garbage */
    snprintf(dir, sizeof(dir), "%s/garbage", base);
    CHECK(mkdir(dir, 0700) == 0);
    snprintf(path, sizeof(path), "%s/data.mdb", dir);
    uint8_t junk[16384];
    for (size_t i = 0; i < sizeof(junk); i++)
        junk[i] = (uint8_t)(i * 7919 + 13);
    write_file(path, junk, sizeof(junk));
    expect_open_fails(dir, CAP_ECORRUPT);

    /* a file of another format */
    snprintf(dir, sizeof(dir), "%s/sqlite", base);
    CHECK(mkdir(dir, 0700) == 0);
    snprintf(path, sizeof(path), "%s/data.mdb", dir);
    uint8_t sq[8192] = "SQLite format 3";
    write_file(path, sq, sizeof(sq));
    expect_open_fails(dir, CAP_ECORRUPT);

    /* a valid env whose data.mdb was truncated to a few bytes */
    snprintf(dir, sizeof(dir), "%s/trunc", base);
    store_env_t *env;
    CHECK_OK(store_env_open(dir, NULL, &env));
    store_env_close(env);
    snprintf(path, sizeof(path), "%s/data.mdb", dir);
    CHECK(truncate(path, 100) == 0);
    expect_open_fails(dir, CAP_ECORRUPT);

    /* an empty data.mdb: LMDB initialises it (a fresh env), which is fine */
    snprintf(dir, sizeof(dir), "%s/empty", base);
    CHECK(mkdir(dir, 0700) == 0);
    snprintf(path, sizeof(path), "%s/data.mdb", dir);
    write_file(path, "", 0);
    CHECK_OK(store_env_open(dir, NULL, &env));
    store_env_close(env);

    /* the data directory is a regular file, or lies under one */
    snprintf(dir, sizeof(dir), "%s/afile", base);
    write_file(dir, "x", 1);
    expect_open_fails(dir, -ENOTDIR);
    snprintf(dir, sizeof(dir), "%s/afile/sub", base);
    expect_open_fails(dir, -ENOTDIR);

    /* read-only open of a directory without an env */
    snprintf(dir, sizeof(dir), "%s/none", base);
    CHECK(mkdir(dir, 0700) == 0);
    store_env_opts_t ro = {.readonly = 1};
    env = NULL;
    CHECK_ERR(store_env_open(dir, &ro, &env), -ENOENT);
    CHECK(env == NULL);

    /* bad arguments */
    CHECK_ERR(store_env_open("", NULL, &env), CAP_EINVAL);
    CHECK_ERR(store_env_open(NULL, NULL, &env), CAP_EINVAL);

    check_rmtree(base);
    cap_free(base);
    fprintf(stderr, "store.damaged: ok\n");
    return 0;
}
