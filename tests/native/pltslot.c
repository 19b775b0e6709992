/*
 * pltslot.c - the address of this object's lazily bound GOT entry for
 * close() (its JUMP_SLOT relocation in DT_JMPREL), compiled with hooktarget.c
 * into a PLT build with -z lazy by tests/test_descriptors.py, so a test can
 * write that entry as the lazy binder or another library's hook would.
 * Reads the object's own dynamic section through its link_map; calls no
 * close() itself, so the entry stays unresolved until someone calls it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <stddef.h>
#include <string.h>

#if __SIZEOF_POINTER__ == 8
#define REL_SYM(info) ELF64_R_SYM(info)
#else
#define REL_SYM(info) ELF32_R_SYM(info)
#endif

/* A dynamic-section address: relocated by the loader on most targets, not on
 * those whose dynamic section is read-only. */
static const void *dyn_ptr(const struct link_map *map, ElfW(Addr) value)
{
    return (const void *)(value < map->l_addr ? value + map->l_addr : value);
}

void **t_close_plt_slot(void)
{
    Dl_info info;
    struct link_map *map = NULL;
    if (dladdr1((void *)t_close_plt_slot, &info, (void **)&map, RTLD_DL_LINKMAP) == 0 || map == NULL)
        return NULL;
    const ElfW(Sym) *symtab = NULL;
    const char *strtab = NULL;
    const ElfW(Rela) *jmprel = NULL;
    size_t size = 0;
    ElfW(Sxword) kind = 0;
    for (const ElfW(Dyn) *d = map->l_ld; d->d_tag != DT_NULL; d++) {
        if (d->d_tag == DT_SYMTAB)
            symtab = dyn_ptr(map, d->d_un.d_ptr);
        else if (d->d_tag == DT_STRTAB)
            strtab = dyn_ptr(map, d->d_un.d_ptr);
        else if (d->d_tag == DT_JMPREL)
            jmprel = dyn_ptr(map, d->d_un.d_ptr);
        else if (d->d_tag == DT_PLTRELSZ)
            size = d->d_un.d_val;
        else if (d->d_tag == DT_PLTREL)
            kind = (ElfW(Sxword))d->d_un.d_val;
    }
    if (symtab == NULL || strtab == NULL || jmprel == NULL || kind != DT_RELA)
        return NULL;
    for (size_t i = 0; i < size / sizeof *jmprel; i++)
        if (strcmp(strtab + symtab[REL_SYM(jmprel[i].r_info)].st_name, "close") == 0)
            return (void **)(map->l_addr + jmprel[i].r_offset);
    return NULL;
}
