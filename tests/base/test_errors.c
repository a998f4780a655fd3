/* test_errors.c - every project error code has a distinct name and message; errno passes through;
 * the byte-order helpers round-trip. */
#include "check.h"

#include <errno.h>

int main(void)
{
    for (int e = CAP_EFIRST; e >= CAP_ELAST; e--) {
        CHECK(strncmp(cap_errname(e), "CAP_E", 5) == 0);
        CHECK(strcmp(cap_strerror(e), "unknown error") != 0);
        for (int f = e - 1; f >= CAP_ELAST; f--)
            CHECK(strcmp(cap_errname(e), cap_errname(f)) != 0);
    }
    CHECK_STREQ(cap_errname(-ENOENT), "ENOENT");
    CHECK_STREQ(cap_strerror(0), "success");
    CHECK_STREQ(cap_strerror(-31999), "unknown error");

    uint8_t b[8];
    cap_put_be64(b, 0x0102030405060708ull);
    CHECK_EQ(b[0], 1);
    CHECK_EQ(b[7], 8);
    CHECK(cap_get_be64(b) == 0x0102030405060708ull);
    cap_put_le64(b, 0x0102030405060708ull);
    CHECK_EQ(b[0], 8);
    CHECK(cap_get_le64(b) == 0x0102030405060708ull);
    CHECK(cap_hash64("abc", 3) == cap_hash64("abc", 3));
    CHECK(cap_hash64("abc", 3) != cap_hash64("abd", 3));
    uint64_t t0 = cap_now_ns();
    CHECK(cap_now_ns() >= t0);
    CHECK(cap_wall_ms() > 1700000000000LL);
    char *d = check_tmpdir("base");
    check_rmtree(d);
    cap_free(d);
    return 0;
}
